import json

import datasets
import pytest

from jpeft.data import DIALOGSUM_SAMPLE, check_columns, load_rows
from jpeft.data.sources import usable_rows
from jpeft.errors import DataError

ROWS = [{"dialogue": "hi there", "summary": "a greeting"}, {"dialogue": "bye", "summary": ""}]


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_json_csv_parquet_and_saved_dir_agree(tmp_path):
    jsonl = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in ROWS])
    array = tmp_path / "d.json"
    array.write_text(json.dumps(ROWS))
    csv = tmp_path / "d.csv"
    csv.write_text("dialogue,summary\nhi there,a greeting\nbye,\n")
    parquet = str(tmp_path / "d.parquet")
    datasets.Dataset.from_list(ROWS).to_parquet(parquet)
    saved = str(tmp_path / "saved")
    datasets.Dataset.from_list(ROWS).save_to_disk(saved)
    for path in (jsonl, str(array), parquet, saved):
        ds = load_rows(path)
        assert ds.to_list() == ROWS, path
        check_columns(ds, path, ["dialogue", "summary"])
    assert load_rows(str(csv)).to_list() == [ROWS[0], {"dialogue": "bye", "summary": None}]  # CSV's only null


def test_an_empty_or_absent_csv_cell_is_missing(tmp_path):
    """CSV cannot tell an empty string from a missing value: both are null, so the row is dropped (counted), or
    with data.strict an error, as a null in JSON lines or parquet is; 'NA' and 'null' stay text."""
    csv = tmp_path / "d.csv"
    csv.write_text("dialogue,summary\nhi there,a greeting\nbye\nyo,\nNA,null\n")
    rows = load_rows(str(csv))
    assert rows["summary"] == ["a greeting", None, None, "null"] and rows["dialogue"][3] == "NA"
    kept, dropped = usable_rows(rows, str(csv), ["dialogue", "summary"])
    assert len(kept) == 2 and sum(dropped.values()) == 2
    with pytest.raises(DataError, match="row 2: column 'summary' is missing \\(null\\)"):
        usable_rows(rows, str(csv), ["dialogue", "summary"], strict=True)


def test_dataset_dict_dir_asks_for_a_split(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="several splits.*dd/train"):
        load_rows(str(tmp_path / "dd"))
    assert len(load_rows(str(tmp_path / "dd" / "train"))) == 2


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(DataError, match="'.*nope.jsonl' not found"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported type"):
        load_rows(str(tmp_path / "d.txt"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        load_rows(str(tmp_path / "plain"))


@pytest.mark.parametrize("lines, message", [
    (['{"a": "x"}', '{"a": "y"}', '{"a": "z",}'], r"d.jsonl' line 3: invalid JSON"),
    (['{"a": "x"}', '', '{"a": "z"}'], r"d.jsonl' line 2 is blank"),
    (['{"a": "x"}', '["a"]'], r"d.jsonl' line 2: expected a JSON object"),
    ([], r"has no rows"),
])
def test_malformed_jsonl_names_the_line(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=message):
        load_rows(path)


def test_jsonl_rows_keep_every_column_and_mixed_types_drop_only_the_rows_needing_them(tmp_path, caplog):
    """As `datasets.load_dataset("json")`: a column the first row lacks is still read (null where absent); a
    column of strings with a number in it keeps its strings, so only a row needing the number is dropped."""
    path = write_jsonl(tmp_path / "d.jsonl", ['{"d": "a"}', '{"d": "b", "s": "B", "id": 1}',
                                              '{"d": "c", "s": 5, "id": "x"}', '{"d": "e", "s": "E"}'])
    ds = load_rows(path)
    assert ds.column_names == ["d", "s", "id"] and ds["s"] == [None, "B", None, "E"]
    assert "column 's' mixes value types; 1 values that do not fit its common type are read as missing (rows 3)" \
        in caplog.text and "column 'id' mixes value types" in caplog.text
    kept, dropped = usable_rows(ds, path, ["d", "s"])
    assert kept["d"] == ["b", "e"] and dropped == {"column 's' missing (null)": 2}
    assert usable_rows(ds, path, ["d"])[0]["d"] == ["a", "b", "c", "e"]  # the mixed id column is never read


def test_rows_needing_no_column_are_all_usable_after_a_selection():
    """Chat rows need no template field; a split's selected rows (datasets 5 cannot select no columns of them)."""
    ds = datasets.Dataset.from_list([{"a": 1}, {"a": 2}, {"a": 3}]).select([0, 2])
    kept, dropped = usable_rows(ds, "x.jsonl", [])
    assert kept["a"] == [1, 3] and dropped == {}


def test_a_nested_value_of_another_type_is_missing_in_its_row_only(tmp_path, caplog):
    """One chat row whose message content is a number: that row's messages are missing (named), the others stay."""
    rows = [json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": c}]})
            for c in ("a", "b", 5, "d")]
    ds = load_rows(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [m is None for m in ds["messages"]] == [False, False, True, False]
    assert "1 values that do not fit its common type are read as missing (rows 3)" in caplog.text


def test_fields_inside_a_column_are_checked_row_by_row(tmp_path):
    """A template's {translation[en]} (HF's WMT rows) needs a string there, not in the column itself."""
    path = write_jsonl(tmp_path / "d.jsonl", ['{"translation": {"en": "Hi", "de": "Hallo"}, "refs": ["a"], "m": {"n": 1}}',
                                              '{"translation": {"en": "Yes"}, "refs": ["b"], "m": {"n": 2}}',
                                              '{"translation": {"en": "No", "de": "Nein"}, "refs": [], "m": {"n": 3}}'])
    kept, dropped = usable_rows(load_rows(path), path, ["translation[en]", "translation[de]", "refs[0]"])
    assert kept["translation"] == [{"en": "Hi", "de": "Hallo"}]
    assert dropped == {"field 'translation[de]' missing (null)": 1, "field 'refs[0]' missing (null)": 1}
    with pytest.raises(DataError, match=r"row 1: field 'm\[n\]' is int 1, not a string \(2 more rows like it\)"):
        check_columns(load_rows(path), path, ["translation[en]", "m[n]"])


def test_check_columns_names_file_row_and_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"a": "x", "b": "1"}', '{"a": "y"}',
                                              '{"a": "z", "b": null}'])
    ds = load_rows(path)
    check_columns(ds, path, ["a"])
    with pytest.raises(DataError, match=r"d.jsonl' row 2: column 'b' is missing \(null\) "
                                        r"\(1 more rows like it\)"):
        check_columns(ds, path, ["a", "b"])
    with pytest.raises(DataError, match="no column 'c'; columns are: a, b"):
        check_columns(ds, path, ["c"])
    ints = write_jsonl(tmp_path / "i.jsonl", ['{"a": 1}', '{"a": 2}'])
    with pytest.raises(DataError, match="row 1: column 'a' is int 1, not a string"):
        check_columns(load_rows(ints), ints, ["a"])


def test_shipped_dialogsum_sample_loads():
    ds = load_rows(DIALOGSUM_SAMPLE)
    check_columns(ds, DIALOGSUM_SAMPLE, ["dialogue", "summary"])
    assert len(ds) == 500
