"""The pre-flight memory check sees a container's limit (cgroup v2 and v1) and counts activations, so a
run that cannot fit is one line before it starts instead of an out-of-memory kill (exit 137)."""

from __future__ import annotations

import pytest

import loom.train.memory as memory


def _cgroup(tmp_path, lines: str, files: dict[str, str]):
    (tmp_path / "self_cgroup").write_text(lines)
    for rel, text in files.items():
        f = tmp_path / "fs" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return {"root": tmp_path / "fs", "self_cgroup": tmp_path / "self_cgroup"}


@pytest.mark.parametrize("lines, files, room", [
    ("0::/job\n", {"job/memory.max": "1073741824\n", "job/memory.current": "73741824\n"}, 1_000_000_000),
    ("0::/job\n", {"job/memory.max": "max\n", "job/memory.current": "5\n"}, None),
    ("4:memory:/docker/abc\n0::/\n", {"memory/docker/abc/memory.limit_in_bytes": "2147483648\n",
                                      "memory/docker/abc/memory.usage_in_bytes": "147483648\n"}, 2_000_000_000),
    # a container sees its own group at the mount's root
    ("4:memory:/process_api/x\n", {"memory/memory.limit_in_bytes": "536870912\n",
                                   "memory/memory.usage_in_bytes": "0\n"}, 536870912),
    ("4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712\n"}, None),  # v1's "no limit"
    ("", {}, None),
])
def test_the_cgroup_limit_is_read_from_v2_and_v1(lines, files, room, tmp_path):
    assert memory.cgroup_room(**_cgroup(tmp_path, lines, files)) == room


def test_a_run_over_the_containers_limit_is_one_line_before_it_starts(tmp_path, tiny_corpus, loom_cli, monkeypatch):
    monkeypatch.setattr(memory, "cgroup_room", lambda: 64 * 2**20)  # a container with 64 MiB left
    args = ["train", "model=gpt-tiny", f"--data={tiny_corpus}", "train.steps=1", f"train.run_dir={tmp_path / 'r'}"]
    code, _, err = loom_cli(*args, "train.batch_size=512")  # state ~2 MiB; activations ~450 MiB
    assert code == 2 and "Traceback" not in err
    assert err.startswith("loom: error:") and err.count("\n") == 1, err
    assert "activations of at least" in err and "container's memory limit" in err and "train.grad_accum" in err
    assert not (tmp_path / "r").exists()  # nothing started
    assert memory.activation_bytes(_cfg(tiny_corpus, "train.batch_size=512", "train.grad_accum=8")) * 8 == \
        pytest.approx(memory.activation_bytes(_cfg(tiny_corpus, "train.batch_size=512")))


def _cfg(tiny_corpus, *overrides):
    from loom.config import load_config

    return load_config(None, ["model=gpt-tiny", f"data.path={tiny_corpus}", *overrides])
