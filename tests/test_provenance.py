"""Run provenance: one record per start or resume, and the code versions a run was trained with."""

import json

from detrkd.provenance import PROVENANCE_FILE, append_run_record, git_sha, read_commands, read_git_shas


def test_git_sha_outside_a_checkout_is_unknown(tmp_path):
    assert git_sha(tmp_path) == "unknown"


def test_records_append_and_code_versions_are_listed_once_in_order(tmp_path, monkeypatch):
    assert read_git_shas(tmp_path) == []  # a run from before provenance was recorded
    for sha in ("aaa", "aaa", "bbb+dirty", "aaa"):
        monkeypatch.setattr("detrkd.provenance.git_sha", lambda sha=sha: sha)
        append_run_record(tmp_path, resume=(tmp_path / PROVENANCE_FILE).exists(), world_size=2)
    records = [json.loads(x) for x in (tmp_path / PROVENANCE_FILE).read_text().splitlines()]
    assert [r["resume"] for r in records] == [False, True, True, True]
    assert {r["world_size"] for r in records} == {2} and all("hardware" in r and "torch" in r for r in records)
    assert read_git_shas(tmp_path) == ["aaa", "bbb+dirty"]


def test_commands_are_the_argv_of_each_start_as_typed(tmp_path, monkeypatch):
    assert read_commands(tmp_path) == []
    argv = ["/x/detrkd/__main__.py", "distill", "--set", "methods={'a': {}}", "--set", "threads=1"]
    monkeypatch.setattr("sys.argv", argv)
    append_run_record(tmp_path, resume=False)
    monkeypatch.setattr("sys.argv", [*argv, "--resume"])
    append_run_record(tmp_path, resume=True)
    first = "detrkd distill --set 'methods={'\"'\"'a'\"'\"': {}}' --set threads=1"
    assert read_commands(tmp_path) == [first, first + " --resume"]
