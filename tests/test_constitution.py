import json
import subprocess
import sys
from pathlib import Path

import pytest

from cai import constitution as C
from cai.errors import InputError

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "constitution" / "default.yaml"
GOOD = """\
name: mini
principles:
  - id: harm
    critique_request: Say how the response could cause harm.
    revision_request: Rewrite it without the harm.
    preference_question: Which response is less harmful?
    weight: 2
  - id: honest
    critique_request: Say what is untrue.
    revision_request: Rewrite it truthfully.
"""


def test_default_constitution_is_valid_and_rich():
    c = C.load(DEFAULT)
    assert 12 <= len(c.principles) <= 16
    assert all(p.preference_question for p in c.principles)
    assert len(c.few_shot) >= 3
    assert c.hash.startswith("sha256:") and len(c.hash) == 71


def test_hash_is_canonical_and_changes_with_content():
    a = C.parse(GOOD)
    reordered_keys = GOOD.replace("    weight: 2\n", "").replace("  - id: harm\n", "  - weight: 2\n    id: harm\n")
    assert C.parse(reordered_keys).hash == a.hash  # key order is not content
    assert C.parse(GOOD.replace("weight: 2", "weight: 3")).hash != a.hash


def test_schema_file_is_current():
    on_disk = json.loads((REPO / "constitution" / "schema.json").read_text())
    assert on_disk == C.json_schema(), "run: cai constitution schema --out constitution/schema.json"


def test_diff_reports_added_removed_changed():
    a = C.parse(GOOD)
    b = C.parse(GOOD.replace("weight: 2", "weight: 5").replace("id: honest", "id: truthful"))
    d = C.diff(a, b)
    assert d["added"] == ["truthful"] and d["removed"] == ["honest"]
    assert d["changed"] == {"harm": {"weight": {"from": 2.0, "to": 5.0}}}


BAD = {
    "invalid_yaml": (GOOD + "  - id: [unclosed\n", ":12:", "invalid YAML"),
    "unknown_key": (GOOD.replace("    weight: 2", "    wieght: 2"), ":7:5: principles[0].wieght: unknown key 'wieght'", "allowed"),
    "missing_key": (GOOD.replace("    revision_request: Rewrite it truthfully.\n", ""), "principles[1].revision_request", "missing required key"),
    "duplicate_ids": (GOOD.replace("id: honest", "id: harm"), "principles[1].id", "duplicate principle id 'harm'"),
    "empty_principles": ("name: mini\nprinciples: []\n", ":2:13: principles", "add at least one principle"),
    "non_positive_weight": (GOOD.replace("weight: 2", "weight: 0"), ":7:13: principles[0].weight", "greater than 0"),
    "object_tag": (GOOD.replace("name: mini", "name: !!python/object/apply:os.system [echo pwned]"), ":1:7:", "tags that construct objects"),
    "alias_bomb": ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b]\n", ":2:8:", "aliases"),
    "bad_id": (GOOD.replace("id: honest", "id: Honest Principle"), "principles[1].id", "not a valid id"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_constitution_one_clear_line(kind, tmp_path):
    text, where, what = BAD[kind]
    path = tmp_path / f"{kind}.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as e:
        C.load(path)
    line = next(p for p in e.value.problems if where in p)
    assert line.startswith(str(path)) and what in line
    assert "\n" not in line


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(GOOD.encode() + "  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.yaml:11: not valid UTF-8"):
        C.load(path)


def test_cli_validate_exit_codes_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("weight: 2", "weight: -1").replace("id: honest", "id: harm"))
    r = subprocess.run([sys.executable, "-m", "cai.cli", "constitution", "validate", str(DEFAULT), str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines and all(line.startswith(str(bad)) for line in lines)
    ok = subprocess.run([sys.executable, "-m", "cai.cli", "constitution", "validate", str(DEFAULT)], capture_output=True, text=True)
    assert ok.returncode == 0 and "ok" in ok.stdout


def test_light_commands_do_not_import_torch():
    code = (
        "import sys; import cai, cai.cli, cai.rounds, cai.prompts, cai.models\n"
        f"sys.argv = ['cai', 'constitution', 'validate', {str(DEFAULT)!r}]\n"
        "try:\n    cai.cli.main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "bad = [m for m in ('torch', 'transformers', 'celery') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
