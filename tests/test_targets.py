"""Targets and resources: shipped targets, your own by folder or by path, one-line errors for a bad board file,
the template, and where tables and tuning records are written ($EDGEPRUNE_HOME, never the package)."""

from __future__ import annotations

import json

import pytest
from helpers import assert_one_line_error

from edgeprune import resources
from edgeprune.codegen.tuning import records_dir
from edgeprune.cost import find_table, new_table, save_table, table_path
from edgeprune.errors import UserError
from edgeprune.targets import get_target, known_targets, target_files, template


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh $EDGEPRUNE_HOME with an empty targets folder."""
    monkeypatch.setenv("EDGEPRUNE_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "targets").mkdir(parents=True)
    return tmp_path / "home"


def _board(path, **changes):
    """cortex-a7's template with fields changed (None: removed), written to `path`."""
    lines = []
    for line in template("cortex-a7").splitlines():
        key = line.split("=")[0].strip()
        if key in changes:
            if changes[key] is not None:
                lines.append(f"{key} = {json.dumps(changes.pop(key))}")
            continue
        lines.append(line)
    lines += [f"{k} = {json.dumps(v)}" for k, v in changes.items() if v is not None]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_shipped_files_are_found_in_the_checkout():
    # This suite runs from the repository; the install test checks the same from a wheel.
    assert resources.shipped_root() == resources.CHECKOUT
    assert (resources.shipped("codegen/runtime") / "edgeprune_rt.c").is_file()
    assert resources.shipped("targets") / "cortex-a7.toml" == target_files()["cortex-a7"].path
    with pytest.raises(FileNotFoundError, match="reinstall"):
        resources.shipped("codegen/no-such-thing")


def test_user_dirs_follow_edgeprune_home_then_the_platform(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPRUNE_HOME", str(tmp_path / "eh"))
    assert resources.user_config_dir() == resources.user_data_dir() == tmp_path / "eh"
    monkeypatch.delenv("EDGEPRUNE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "u"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", "relative/is/ignored")
    assert resources.user_config_dir() == tmp_path / "xdg-config" / "edgeprune"
    assert resources.user_data_dir() == tmp_path / "u" / ".local" / "share" / "edgeprune"


def test_tables_and_tuning_records_go_to_the_data_dir_and_shipped_tables_are_defaults(home, monkeypatch, tmp_path):
    host = get_target("host")
    assert table_path("host-x") == home / "calibrate" / "host-x.json"
    assert records_dir(host).parent == home / "tuning"
    assert not str(table_path("host-x")).startswith(str(resources.PACKAGE))

    shipped = tmp_path / "_data"  # as an install lays them out
    (shipped / "calibrate").mkdir(parents=True)
    monkeypatch.setattr(resources, "INSTALLED", shipped)
    assert find_table("board") is None
    save_table(shipped / "calibrate" / "board.json", new_table({"uri": "local"}))
    assert find_table("board") == shipped / "calibrate" / "board.json"
    save_table(table_path("board"), new_table({"uri": "local"}))
    assert find_table("board") == home / "calibrate" / "board.json"  # yours first


def test_the_build_loop_reads_a_shipped_table_and_writes_what_it_learns_to_yours(home, monkeypatch, tmp_path):
    from edgeprune.cost import learn, load_table
    from edgeprune.measure.devices import LocalDevice
    from edgeprune.pipeline import Request, _table_for

    host, device = get_target("host"), LocalDevice()
    shipped = tmp_path / "_data"
    monkeypatch.setattr(resources, "INSTALLED", shipped)
    default = shipped / "calibrate" / f"{device.table_name(host)}.json"
    save_table(default, new_table(device.identity(host), threads=7))  # threads: to tell it from a new table
    before = default.read_bytes()

    path, table = _table_for(Request(target="host", budget_ms=1.0, out=tmp_path / "out"), device, host)
    assert path == home / "calibrate" / default.name and table.threads == 7
    learn(table, [], path)
    assert load_table(path).threads == 7 and default.read_bytes() == before


def test_your_folder_adds_targets_beside_the_shipped_ones(home):
    _board(home / "targets" / "myboard.toml", clock_mhz=1200)
    files = target_files()
    assert files["myboard"].origin == "yours" and files["cortex-a7"].origin == "shipped"
    assert {"myboard", "cortex-a7", "host"} <= set(known_targets())
    board = get_target("myboard")
    assert board.name == "myboard" and board.clock_mhz == 1200 and board.triple == get_target("cortex-a7").triple


def test_yours_replaces_a_shipped_target_of_the_same_name_and_the_listing_says_so(home, cli):
    _board(home / "targets" / "cortex-a53.toml", clock_mhz=999, description="my A53")
    assert get_target("cortex-a53").clock_mhz == 999
    rc, out, err = cli("targets")
    assert rc == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert " yours " in rows["cortex-a53"] and " shipped " in rows["cortex-a7"]
    assert "cortex-a53" in out.splitlines()[-1] and str(home / "targets") in out
    rc, out, _ = cli("targets", "--json")
    listed = {t["name"]: t for t in json.loads(out)}
    assert listed["cortex-a53"]["from"] == "yours" and listed["cortex-a53"]["file"].startswith(str(home))


def test_a_board_given_by_path_is_found_again_by_its_name(home, tmp_path):
    path = _board(tmp_path / "boards" / "pathboard.toml", cores=2)
    board = get_target(str(path))
    assert board.name == "pathboard" and board.cores == 2
    assert get_target("pathboard") == board  # a build records the name; running it looks the name up again


def test_two_boards_of_one_name_are_refused(home, tmp_path):
    _board(home / "targets" / "twin.toml")
    other = _board(tmp_path / "twin.toml", cores=1)
    with pytest.raises(UserError, match="twin") as e:
        get_target(str(other))
    assert "\n" not in str(e.value)


def test_the_template_loads_as_the_board_it_came_from(home):
    text = template("cortex-a7")
    assert text.startswith("#") and str(home / "targets") in text
    (home / "targets" / "copy.toml").write_text(text)
    copy, original = get_target("copy"), get_target("cortex-a7")
    assert copy.name == "copy"
    assert {**copy.__dict__, "name": ""} == {**original.__dict__, "name": ""}


def test_template_is_printed_by_the_cli(cli):
    rc, out, err = cli("targets", "--template", "cortex-m7")
    assert rc == 0 and err == ""
    assert 'triple = "thumbv7em-none-eabihf"' in out and "# name = " in out


@pytest.mark.parametrize(("changes", "needles"), [
    ({"cpu": None}, ["lacks field cpu"]),
    ({"cpu": None, "cores": None}, ["cpu", "cores"]),
    ({"clock_mz": 1200}, ["clock_mz", "did you mean clock_mhz"]),
    ({"cores": "four"}, ["cores", "whole number", "'four'"]),
    ({"cores": 0}, ["cores", "more than zero"]),
    ({"simd_bits": 100}, ["simd_bits", "multiple of 32"]),
    ({"features": "+neon"}, ["features", "list of strings"]),
    ({"mem_bandwidth_gbs": True}, ["mem_bandwidth_gbs", "a number"]),
    ({"default_format": "elf"}, ["default_format", "so, c"]),
    ({"name": "other"}, ["name 'other'", "rename the file"]),
    ({"cross_compiler": "detect"}, ["cross_compiler", "detect"]),
])
def test_a_bad_board_file_is_one_line_naming_field_and_file(cli, home, tmp_path, changes, needles):
    path = _board(tmp_path / "bad.toml", **changes)
    rc, out, err = cli("compile", "builtin:none", "--target", path, "-o", tmp_path / "out")
    assert rc == 2 and out == ""
    assert_one_line_error(err, str(path), *needles)
    assert not (tmp_path / "out").exists()


def test_a_bad_file_in_your_folder_is_named_by_the_listing(cli, home):
    (home / "targets" / "broken.toml").write_text("triple = [unclosed\n")
    rc, out, err = cli("targets")
    assert rc == 2
    assert_one_line_error(err, str(home / "targets" / "broken.toml"), "not valid TOML")


@pytest.mark.parametrize(("spec", "needles"), [
    ("no/such/board.toml", ["no/such/board.toml", "does not exist", "--template"]),
    ("myboard", ["unknown target 'myboard'", "cortex-a7", "path of its TOML"]),
])
def test_a_missing_board_is_one_line_saying_what_to_do(cli, home, tmp_path, spec, needles):
    rc, _, err = cli("compile", "builtin:none", "--target", spec, "-o", tmp_path / "out")
    assert rc == 2
    assert_one_line_error(err, *needles)
